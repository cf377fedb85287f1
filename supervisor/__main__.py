"""Run a supervisor with settings from the environment: ``python -m supervisor``.

The same as ``analysisctl supervisor run`` without flags; useful where the
CLI's dependencies are not wanted, such as tests that start supervisors.
"""

import logging
import sys

from supervisor import config, logs, loop
from supervisor.errors import ConfigError

if __name__ == "__main__":
    try:
        settings = config.load()
    except ConfigError as error:
        logs.configure()
        logging.getLogger("supervisor").critical(
            "supervisor cannot start",
            extra={"event": "supervisor_start_failed", "error": error.message, "exit_code": error.exit_code})
        sys.exit(error.exit_code)
    sys.exit(loop.run_supervisor(settings))
