# ipamd: `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml | cksum | cut -d' ' -f1)
SOURCES := $(shell find appliance -name '*.py') schema.sql packaging/ipamd.spec
ARGS   ?=
# Debian packages the tests use; installed when missing and we are root (as in CI).
DEBS   := sqlite3 iproute2 iputils-ping containernetworking-plugins nftables docker.io busybox-static

.PHONY: setup sysdeps run test bench dist clean sim soak-sim soak fuzz scale report

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

sysdeps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: not root, so not installing:$$missing (tests needing them skip outside CI)"; fi; \
	fi

## Start a single-host daemon in the foreground on defaults (range 10.32.0.0/12).
run: $(STAMP)
	$(BIN)/ipamd launch $(ARGS)

## The whole test tier (what CI runs).
test: $(STAMP) sysdeps dist
	$(BIN)/pytest -q -p no:cacheprovider

## Benchmarks: printed tables, never pass/fail on timing.
bench: $(STAMP) dist
	$(BIN)/python -m tests.bench.hook_bench
	$(BIN)/python -m tests.bench.cni_bench
	$(BIN)/python -m tests.bench.gossip_bench
	$(BIN)/python -m tests.bench.ring_bench
	$(BIN)/python -m tests.bench.peer_bench
	$(BIN)/python -m tests.bench.scrape_bench
	$(BIN)/python -m tests.bench.history_bench
	$(BIN)/python -m tests.bench.wal_bench

## What an idle daemon costs as the cluster grows: make bench-idle [N="10 20 40"] [IDLE=15]
## (N's default is this target's own: make scale has another)
bench-idle: N ?= 10 20 40
IDLE ?= 15
.PHONY: bench-idle
bench-idle: $(STAMP)
	$(BIN)/python -m tests.bench.idle_bench -n $(N) --idle $(IDLE)

## One host's allocation latency in an N-host cluster, that host with a core of its own (the
## other N-1 daemons on the other core): make bench-host [N=100] [SECONDS=60]
bench-host: N ?= 100
bench-host: SECONDS ?= 60
.PHONY: bench-host
bench-host: $(STAMP)
	$(BIN)/python -m tests.bench.host_bench --hosts $(N) --seconds $(SECONDS)

## What a long history costs: make bench-history [CYCLES=1000000] (default 100000)
CYCLES ?= 100000
.PHONY: bench-history
bench-history: $(STAMP)
	$(BIN)/python -m tests.bench.history_bench --cycles $(CYCLES)

## N real daemons on 127.0.0.1 under the requirements' workload (containers per host, starts/s
## and hosts replaced scale down with N; the run prints what it used): allocation p50/p95/p99,
## join, rmpeer and ring propagation times, CPU, peer bytes and RSS per daemon; exits 1 on a
## duplicate or lost allocation. Figures go to docs/scale/scale-run.json:
## make scale [N=100] [SECONDS=30]
scale: N ?= 100
scale: SECONDS ?= 30
scale: $(STAMP)
	$(BIN)/python -m tests.scale --hosts $(N) --seconds $(SECONDS) --json docs/scale/scale-run.json

## The scale matrix in the simulator (tests/sim/matrix.py: the requirements' dimensions at 20
## and 100 peers, node count up to 100, 200 and 1,000 with huge), then docs/scale-report.md with its plots in docs/scale/ (and the figures of the
## last `make scale`): make report [MATRIX=quick|full|huge] [REPLOT=1 to re-plot the last matrix]
## (huge: full, and 200 and 1,000 peers: about 35 minutes, nearly all of it the 1,000)
MATRIX ?= full
REPLOT ?=
report: $(STAMP)
	$(if $(REPLOT),,$(BIN)/python -m tests.sim.matrix --size $(MATRIX) --json docs/scale/matrix.json)
	$(BIN)/python -m tests.scale.report

## Replay one simulator seed: make sim SEED=123 [PEERS=5] [OPS=1000]
SEED ?=
PEERS ?=
OPS ?= 1000
sim: $(STAMP)
	$(BIN)/python -m tests.sim $(if $(SEED),--seed $(SEED)) $(if $(PEERS),--peers $(PEERS)) --ops $(OPS)

## Random simulator seeds until time is up: make soak-sim MINUTES=30
MINUTES ?= 10
soak-sim: $(STAMP)
	$(BIN)/python -m tests.sim --minutes $(MINUTES) $(if $(PEERS),--peers $(PEERS)) --ops $(OPS)

## Real daemons in network namespaces, churn and a fault every 10 s (root): make soak MINUTES=30
soak: $(STAMP) sysdeps
	$(BIN)/python -m tests.chaos --minutes $(MINUTES)

## Hostile input (tests/fuzz): random and mutated frames on the hook socket, the Docker socket
## and the peer port (with and without the secret) of two real daemons on 127.0.0.1, then their
## invariants and integrity_check: make fuzz MINUTES=30 [SEED=n]. Prints the seed to replay.
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --minutes $(MINUTES) $(if $(SEED),--seed $(SEED))

## The frozen single-file executable, and the compiled CNI forwarder (see README).
dist: dist/ipamd dist/ipamd-cni
dist/ipamd: $(STAMP) $(SOURCES)
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller packaging/ipamd.spec
dist/ipamd-cni: packaging/cni-forward.c
	@mkdir -p dist
	$(CC) -O2 -Wall -Wextra -Werror -static -o $@ $< 2>/dev/null || $(CC) -O2 -Wall -Wextra -Werror -o $@ $<

clean:
	rm -rf build dist $(VENV)

## Mutation testing (mutmut, [tool.mutmut] in pyproject.toml; tests/mutate.py): faults planted
## in the core and the entrances (cni_ops, protocols/docker_ipam, sweeper) must fail the fast tests. Each
## mutant runs only the in-process tests that call its function, two at a time. All of it takes
## hours; MUTANTS picks some: make mutate MUTANTS='appliance.core.intervals*'. Results stay in
## mutants/ and a later run resumes them (rm -rf mutants to start afresh). MIN_SCORE=percent
## fails the target below that score.
MUTANTS ?=
MIN_SCORE ?=
.PHONY: mutate
mutate: $(STAMP)
	$(BIN)/mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/python -m tests.mutate $(foreach m,$(MUTANTS),'$(m)') $(if $(MIN_SCORE),--min-score $(MIN_SCORE))
