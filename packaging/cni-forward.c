/*
 * ipamd-cni: the CNI plugin as the runtime execs it. It forwards the CNI_* environment and
 * stdin to the ipamd daemon's hook socket and prints what the daemon answers, exiting with the
 * code the daemon chose. All CNI logic lives in the daemon (appliance/protocols/cni.py); this
 * exists because a Python start costs more than the whole 10 ms budget of an ADD.
 *
 * Request: {"v":1,"op":"cni","env":{...},"stdin":"..."}\n, each byte of env values and stdin
 * carried as one code point (latin-1), so no UTF-8 handling is needed here.
 * Reply: {"ok":true,"exit":N,"length":L}\n followed by L bytes to print.
 * The socket: ipam.socket in the network config, else $IPAMD_SOCKET, else the default.
 * Bounds: the request line may be at most MAX_REQUEST bytes (the daemon's hook line limit), and
 * the whole exchange (connecting, sending, the whole answer) must be done within
 * REPLY_TIMEOUT_MS ($IPAMD_CNI_TIMEOUT seconds if set), else CNI error 11 (try again later):
 * a stalled daemon whose listen backlog is full makes connect() wait, so it has the deadline too.
 * Whatever happens, stdout gets exactly one JSON document (or, for DEL/CHECK, the daemon's
 * possibly empty output): the reply is read whole before any of it is printed.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_STDIN (1 << 20)
#define MAX_REQUEST (64 * 1024)        /* appliance/protocols/hook.py MAX_LINE */
#define REPLY_TIMEOUT_MS 20000         /* an ADD may wait 2 s for peers; this is far above */

extern char **environ;

typedef struct { char *p; size_t len, cap; } buf_t;

static void put(buf_t *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) { perror("ipamd-cni"); exit(1); }
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void puts_(buf_t *b, const char *s) { put(b, s, strlen(s)); }

/* A JSON string of raw bytes, each byte one code point. */
static void put_json(buf_t *b, const unsigned char *s, size_t n) {
    char tmp[8];
    put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') { tmp[0] = '\\'; tmp[1] = c; put(b, tmp, 2); }
        else if (c < 0x20 || c >= 0x7f) { snprintf(tmp, sizeof tmp, "\\u%04x", c); put(b, tmp, 6); }
        else put(b, (const char *)&c, 1);
    }
    put(b, "\"", 1);
}

/* --- just enough JSON reading to find ipam.socket ------------------------------------------ */
static const char *ws(const char *p, const char *e) {
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* Skip a string starting at '"'; return the position after it, or NULL. */
static const char *skip_str(const char *p, const char *e) {
    for (p++; p < e; p++) {
        if (*p == '\\') p++;
        else if (*p == '"') return p + 1;
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *e, int depth) {
    p = ws(p, e);
    if (p >= e || depth > 64) return NULL;
    if (*p == '"') return skip_str(p, e);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = ws(p + 1, e);
        if (p < e && *p == close) return p + 1;
        for (;;) {
            if (close == '}') {
                if (p >= e || *p != '"' || !(p = skip_str(p, e))) return NULL;
                p = ws(p, e);
                if (p >= e || *p != ':') return NULL;
                p++;
            }
            if (!(p = skip_value(p, e, depth + 1))) return NULL;
            p = ws(p, e);
            if (p < e && *p == ',') { p = ws(p + 1, e); continue; }
            return p < e && *p == close ? p + 1 : NULL;
        }
    }
    while (p < e && strchr("+-0123456789.eEtruefalsn", *p)) p++;
    return p;
}

/* In the object at p, the value of key (a plain key without escapes), or NULL. */
static const char *member(const char *p, const char *e, const char *key) {
    size_t klen = strlen(key);
    p = ws(p, e);
    if (p >= e || *p != '{') return NULL;
    p = ws(p + 1, e);
    while (p < e && *p == '"') {
        const char *k = p + 1, *after = skip_str(p, e);
        if (!after) return NULL;
        int match = (size_t)(after - 1 - k) == klen && memcmp(k, key, klen) == 0;
        p = ws(after, e);
        if (p >= e || *p != ':') return NULL;
        p = ws(p + 1, e);
        if (match) return p;
        if (!(p = skip_value(p, e, 1))) return NULL;
        p = ws(p, e);
        if (p < e && *p == ',') p = ws(p + 1, e);
    }
    return NULL;
}

/* ipam.socket copied into out: 1; none given: 0; given but unusable (not a plain string,
 * escapes, empty, a NUL byte, too long for a unix socket address): -1, never a silent fallback
 * to another daemon's socket (nor a cut-short path, which names another one). */
static int config_socket(const char *s, size_t n, char *out, size_t outlen) {
    const char *e = s + n, *ipam = member(s, e, "ipam"), *v;
    if (!ipam || !(v = member(ipam, e, "socket"))) return 0;
    if (*v != '"') return -1;
    const char *end = memchr(v + 1, '"', e - v - 1);
    if (!end || memchr(v + 1, '\\', end - v - 1) || memchr(v + 1, 0, end - v - 1) ||
        (size_t)(end - v - 1) >= outlen || end == v + 1) return -1;
    memcpy(out, v + 1, end - v - 1);
    out[end - v - 1] = 0;
    return 1;
}

/* 0, or -1 when the path does not fit a unix socket address (it would name another socket
 * cut short: out then holds the path up to where it fits, for the message). */
static int default_socket(char *out, size_t outlen) {
    const char *env = getenv("IPAMD_SOCKET"), *rt = getenv("XDG_RUNTIME_DIR");
    int n;
    if (env && *env) n = snprintf(out, outlen, "%s", env);
    else if (geteuid() == 0) n = snprintf(out, outlen, "/run/ipamd/ipamd.sock");
    else if (rt && *rt) n = snprintf(out, outlen, "%s/ipamd.sock", rt);
    else n = snprintf(out, outlen, "/tmp/ipamd-%u/ipamd.sock", (unsigned)geteuid());
    return n < 0 || (size_t)n >= outlen ? -1 : 0;
}

static int fail(int code, const char *msg, const char *path, const char *why) {
    buf_t b = {0};
    char num[16];
    snprintf(num, sizeof num, "%d", code);
    puts_(&b, "{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": ");
    puts_(&b, num);
    puts_(&b, ",\n    \"msg\": ");
    put_json(&b, (const unsigned char *)msg, strlen(msg));
    puts_(&b, ",\n    \"details\": ");
    buf_t d = {0};
    puts_(&d, path);
    puts_(&d, ": ");
    puts_(&d, why);
    put_json(&b, (const unsigned char *)d.p, d.len);
    puts_(&b, "\n}");
    fwrite(b.p, 1, b.len, stdout);
    return 1;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w;
    }
    return 0;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* connect() and write() on fd give up (EAGAIN) at deadline, at the latest. */
static void send_by(int fd, long long deadline) {
    long long left = deadline - now_ms();
    if (left < 1) left = 1;  /* 0 would mean no limit at all */
    struct timeval tv = {.tv_sec = left / 1000, .tv_usec = (left % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Read once from fd, waiting at most until deadline (ms of CLOCK_MONOTONIC): >0 bytes,
 * 0 closed, -1 error, -2 timed out. */
static ssize_t read_by(int fd, char *p, size_t n, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return -2;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int k = poll(&pfd, 1, (int)left);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return -1;
        if (k == 0) return -2;
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        return r;
    }
}

int main(void) {
    buf_t in = {0}, req = {0};
    char chunk[65536], path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    ssize_t r;
    signal(SIGPIPE, SIG_IGN);  /* a daemon that hangs up gives EPIPE, and an answer, not death */
    while ((r = read(0, chunk, sizeof chunk)) > 0 && in.len <= MAX_STDIN) put(&in, chunk, r);
    if (!in.p) put(&in, "", 0);

    const char *cmd = getenv("CNI_COMMAND");
    int status = cmd && strcmp(cmd, "STATUS") == 0;
    int given = config_socket(in.p, in.len, path, sizeof path);
    if (given < 0)
        return fail(7, "ipam.socket must be a plain string path shorter than 108 bytes",
                    "ipam.socket", "not used: no other socket is tried in its place");
    int too_long = !given && default_socket(path, sizeof path) < 0;

    puts_(&req, "{\"v\":1,\"op\":\"cni\",\"env\":{");
    int first = 1;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, "CNI_", 4) != 0 || !eq) continue;
        if (!first) puts_(&req, ",");
        first = 0;
        put_json(&req, (const unsigned char *)*e, eq - *e);
        puts_(&req, ":");
        put_json(&req, (const unsigned char *)eq + 1, strlen(eq + 1));
    }
    puts_(&req, "},\"stdin\":");
    put_json(&req, (const unsigned char *)in.p, in.len);
    puts_(&req, "}\n");
    if (req.len > MAX_REQUEST) {
        char why[96];
        snprintf(why, sizeof why, "%zu bytes as sent, at most %d", req.len, MAX_REQUEST);
        return fail(7, "the network config is too large for ipamd", "request", why);
    }

    const char *t = getenv("IPAMD_CNI_TIMEOUT");  /* seconds; for tests and slow hosts */
    double secs = t ? atof(t) : 0;
    long long wait_ms = secs > 2e6 ? 2000000000LL  /* ~23 days: poll() takes an int */
                        : secs > 0 ? (long long)(secs * 1000) : REPLY_TIMEOUT_MS;
    long long deadline = now_ms() + wait_ms;

    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    if (fd >= 0) send_by(fd, deadline);
    if (too_long) errno = ENAMETOOLONG;
    if (too_long || fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        (send_by(fd, deadline), write_all(fd, req.p, req.len) < 0)) {
        const char *why = errno == EAGAIN || errno == EWOULDBLOCK ? "timed out"
                                                                  : strerror(errno);
        return status ? fail(50, "the ipamd daemon is not available", path, why)
                      : fail(11, "cannot reach the ipamd daemon; try again later", path, why);
    }

    buf_t reply = {0};
    char *nl = NULL;
    while (!(nl = reply.p ? memchr(reply.p, '\n', reply.len) : NULL)) {
        r = read_by(fd, chunk, sizeof chunk, deadline);
        if (r == -2)
            return fail(11, "no answer from the ipamd daemon in time; try again later", path,
                        "timed out");
        if (r <= 0) return fail(11, "the ipamd daemon closed the connection", path, "no reply");
        put(&reply, chunk, r);
    }
    *nl = 0;
    size_t head = (size_t)(nl + 1 - reply.p);
    const char *ex = strstr(reply.p, "\"exit\":"), *ln = strstr(reply.p, "\"length\":");
    if (!strstr(reply.p, "\"ok\":true") || !ex || !ln)
        return fail(7, "ipamd refused the request", path, reply.p);
    int code = atoi(ex + 7);
    size_t want = strtoul(ln + 9, NULL, 10);
    while (reply.len - head < want) {  /* the whole output first: never half a document */
        r = read_by(fd, chunk, sizeof chunk, deadline);
        if (r == -2)
            return fail(11, "no answer from the ipamd daemon in time; try again later", path,
                        "timed out mid-reply");
        if (r <= 0) return fail(11, "the ipamd daemon went away mid-reply", path, "short read");
        put(&reply, chunk, r);
    }
    fwrite(reply.p + head, 1, want, stdout);
    return code;
}
