"""Exit codes, listed in docs/OPERATIONS.md (Exit codes); RotatorError is in the shared block
(core/generator.py).
"""


# Exit codes, listed in docs/OPERATIONS.md (Exit codes).
EXIT_OK = 0
EXIT_FAILED = 1         # knockd did not take the new file; the old one is back
EXIT_USAGE = 2          # bad command line
EXIT_ENVIRONMENT = 3    # a KNOCKD_ROTATOR_* variable is missing or invalid
EXIT_CONFIG = 4         # knockd.conf cannot be read, or knockd would refuse it
EXIT_BUSY = 6           # another run held the lock for too long
EXIT_RECOVERY = 7       # knockd is down and could not be brought back: act now
