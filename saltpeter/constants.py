"""Every named constant of the daemon, defined once."""

# Exit codes recorded in results (SPEC section 6).
RETCODE_TIMEOUT = 124
RETCODE_KILLED = 143
RETCODE_HEARTBEAT_LOST = 253
RETCODE_NO_RESPONSE = 255

# Wrapper liveness.
# The wrapper heartbeats every 5 s (wrapper/runner.py, which imports nothing of ours).
HEARTBEAT_LOSS_AFTER = 15.0       # no message for this long: the machine is lost (253)
DEFAULT_CONNECT_DEADLINE = 60.0   # a launched wrapper that never connects by then: 255

# Killing: SIGTERM, then SIGKILL this much later (done by the wrapper).
KILL_GRACE = 5.0
# How long the worker waits for a killed wrapper's own report before it records the
# result itself (the grace above plus time for the report to arrive).
KILL_REPORT_WAIT = KILL_GRACE + 10.0

# Output.
DEFAULT_RET_CAP = 1024 * 1024     # characters of output kept in state['...']['ret']
TRUNCATION_MARKER = "[... saltpeter: output truncated, showing the last {kept} of {total} characters; the full output is in the log file ...]\n"

# Loops.
WORKER_POLL_INTERVAL = 0.25       # per-run worker checks its machines this often
STATE_FLUSH_INTERVAL = 0.25       # WebSocket server writes live output into state this often
CONFIG_CHECK_INTERVAL = 1.0       # config dir is stat()ed this often
SHUTDOWN_GRACE = 8.0              # children get this long after SIGTERM before SIGKILL

LOCK_POOL_SIZE = 64

# Legacy allow_overlap magic string (SPEC section 4).
ALLOW_OVERLAP_PHRASE = "i know what i am doing!"

# Config directory (SPEC section 4).
CONFIG_FILE_SUFFIX = ".yaml"
MAINTENANCE_KEY = "saltpeter_maintenance"
API_ACCESS_KEY = "saltpeter_api"            # API access control: users and read_only
LEGACY_CONFIG_KEY = "saltpeter_config"     # legacy daemon settings key: tolerated, ignored
TARGET_TYPES = ("glob", "pcre", "list", "grain", "grain_pcre", "pillar", "pillar_pcre",
                "nodegroup", "range", "compound", "ipcidr")
