"""Run a supervisor with settings from the environment: ``python -m supervisor``.

The same as ``analysisctl supervisor run`` without flags; useful where the
CLI's dependencies are not wanted, such as tests that start supervisors.
"""

import sys

from supervisor import config, loop
from supervisor.errors import ConfigError

if __name__ == "__main__":
    try:
        settings = config.load()
    except ConfigError as error:
        print(f"error: {error.message}", file=sys.stderr)
        sys.exit(error.exit_code)
    sys.exit(loop.run_supervisor(settings))
