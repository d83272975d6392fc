import os
import sys

if "CNI_COMMAND" in os.environ:
    # Invoked as a CNI plugin: forward, importing nothing heavy.
    from appliance.cni_forward import main
else:
    from appliance.cli import main

sys.exit(main())
