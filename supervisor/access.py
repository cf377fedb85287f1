"""Database roles of the service and what the current session may do.

Postgres enforces access (migration 0004): three group roles, their grants,
and row-level security policies on jobs, job_events and job_results. A login
role gets its privileges by membership in a group role:

- ``analysis_supervisor`` claims, updates and prunes every job;
- ``analysis_operator`` reads and cancels every job and may submit for
  another user;
- ``analysis_analyst`` submits, reads and cancels only its own jobs, those
  whose ``submitted_by`` is its login name (``session_user``).

Superusers and the owner of the tables bypass row-level security and keep
full access. This module names the roles, reads the session's standing so
the store can reject a request with a clear message before writing, and
turns the server's ``insufficient_privilege`` errors into ``PermissionDenied``.
"""

from __future__ import annotations

import dataclasses

import psycopg
import sqlalchemy as sa

from supervisor.errors import PermissionDenied

SUPERVISOR_ROLE = "analysis_supervisor"
OPERATOR_ROLE = "analysis_operator"
ANALYST_ROLE = "analysis_analyst"
ROLES = (SUPERVISOR_ROLE, OPERATOR_ROLE, ANALYST_ROLE)

# key_scope of the jobs that sessions seeing every job submit: their job keys
# deduplicate across users, as before roles existed.
SHARED_KEY_SCOPE = ""


@dataclasses.dataclass(frozen=True)
class Session:
    """Identity and standing of a database session."""

    # session_user: the login role. SET ROLE does not change it, so a client
    # cannot pass itself off as another user that way.
    user: str
    # Row-level security applies to this session: it is neither a superuser
    # nor the owner of the tables (nor a member of the owner role).
    restricted: bool
    # The session has the privileges of analysis_operator.
    operator: bool

    @property
    def may_act_for_others(self) -> bool:
        return not self.restricted or self.operator

    @property
    def key_scope(self) -> str:
        """The key_scope of jobs this session submits: shared unless it can read only its own jobs."""
        return SHARED_KEY_SCOPE if self.may_act_for_others else self.user


def current_session(connection: sa.Connection) -> Session:
    """Return the identity and standing of the session behind ``connection``."""
    row = connection.execute(
        sa.text(
            "SELECT CAST(session_user AS text) AS user, row_security_active('jobs') AS restricted, "
            "pg_has_role(:operator, 'USAGE') AS operator"
        ),
        {"operator": OPERATOR_ROLE},
    ).one()
    return Session(user=row.user, restricted=row.restricted, operator=row.operator)


def acting_user(session: Session, requested: str | None, *, action: str) -> str:
    """Return the user name to record for ``action``: ``requested``, or the session's login name.

    Raises ``PermissionDenied`` when ``requested`` names another user and the
    session may act only as itself.
    """
    if requested is None or requested == session.user or session.may_act_for_others:
        return session.user if requested is None else requested
    raise PermissionDenied(
        f"not permitted to {action} as user {requested!r}: the database login {session.user!r} may act only "
        f"as itself, and only members of {OPERATOR_ROLE} may act for another user; leave out --user, or ask "
        f"an administrator to run GRANT {OPERATOR_ROLE} TO {session.user}"
    )


def is_permission_error(error: BaseException) -> bool:
    """Return whether ``error`` is Postgres's insufficient_privilege (SQLSTATE 42501).

    The server raises it for a missing privilege and for a row that a
    row-level security policy rejects.
    """
    return isinstance(getattr(error, "orig", error), psycopg.errors.InsufficientPrivilege)


def permission_denied(error: BaseException) -> PermissionDenied:
    """Return the ``PermissionDenied`` for an insufficient_privilege error from the server."""
    detail = str(getattr(error, "orig", error)).strip().splitlines()
    reason = detail[0] if detail else "permission denied"
    if "job_limits" in reason or reason.endswith('table "jobs"') or "table jobs" in reason:
        hint = ("setting limits and pruning jobs are for the owner of the tables (the login that ran "
                "`analysisctl db upgrade`) or a superuser")
    else:
        hint = (f"an administrator grants it through membership in {ANALYST_ROLE} (own jobs), {OPERATOR_ROLE} "
                f"(every job) or {SUPERVISOR_ROLE} (running jobs)")
    return PermissionDenied(f"not permitted: {reason}; the database login lacks the privilege: {hint}")
