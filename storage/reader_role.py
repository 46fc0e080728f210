"""A read-only PostgreSQL role for the people who query the archive (quality engineers, BI
tools): `rollscan db reader NAME`.

The application's own user may write, delete and lock anything: an ad-hoc session as that user
could change the archive, or hold a row a worker waits for. The reader role may only read, in
read-only transactions, and its sessions are bounded (a statement, an idle open transaction)
so that a forgotten psql neither blocks a migration nor holds a snapshot for days. Its dates
read in the site's time zone (`ROLLSCAN_TIMEZONE`): `completed_at::date` is the site's day, as
`rollscan rolls` prints it.

Views are dropped and created again by migrations; the default privileges of the role that runs
them grant the reader every table and view created later, so the grant outlives upgrades.
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, text

READER_NAME_RE = r"[a-z_][a-z0-9_]{0,62}"
STATEMENT_TIMEOUT = "10min"
IDLE_IN_TRANSACTION_TIMEOUT = "5min"


def grant_reader(conn: Connection, name: str, timezone: str, password: str | None) -> bool:
    """Create (or bring up to date) the login role `name`, read-only on this database's schema
    `public`; returns whether it was created. `password` None leaves the role's password as it
    is (none, for a new role: it logs in the way pg_hba.conf allows, e.g. a certificate)."""
    if not re.fullmatch(READER_NAME_RE, name):
        raise ValueError(
            f"reader role {name!r}: use lower-case letters, digits and '_', starting with a "
            "letter or '_' (at most 63)"
        )
    role = f'"{name}"'  # checked above: nothing to escape
    exists = conn.scalar(text("SELECT count(*) FROM pg_roles WHERE rolname = :n"), {"n": name})
    if exists and (more := _more_than_reading(conn, name)):
        raise ValueError(
            f"role {name} exists and may do more than read ({more}): choose another name"
        )
    if not exists:
        conn.execute(text(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"))
    # a role made before (by this command or by hand) keeps no right but reading
    conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"))
    conn.execute(text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}"))
    conn.execute(text(f"REVOKE CREATE ON SCHEMA public FROM {role}"))
    if password is not None:
        # hashed here as the server would (its password_encryption): the statement reaches the
        # server's log with a failed ALTER, or with every DDL (log_statement = ddl), and the
        # password in clear was in it
        from psycopg2.extensions import encrypt_password

        hashed = encrypt_password(password, name, conn.connection.dbapi_connection)
        conn.execute(text(f"ALTER ROLE {role} PASSWORD :pw"), {"pw": hashed})
    database = conn.scalar(text("SELECT current_database()"))
    quoted_db = '"' + database.replace('"', '""') + '"'
    for setting, value in (
        ("default_transaction_read_only", "on"),
        ("statement_timeout", STATEMENT_TIMEOUT),
        ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_TIMEOUT),
        ("timezone", timezone),
    ):
        # per database: the same role may read another site's database in its own zone
        conn.execute(text(f"ALTER ROLE {role} IN DATABASE {quoted_db} SET {setting} = :v"),
                     {"v": value})  # fmt: skip
    conn.execute(text(f"GRANT CONNECT ON DATABASE {quoted_db} TO {role}"))
    conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
    conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    conn.execute(text(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE CURRENT_USER IN SCHEMA public GRANT SELECT ON TABLES TO {role}"
    ))  # fmt: skip
    return not exists


def _more_than_reading(conn: Connection, name: str) -> str:
    """What an existing role may do beyond reading, that revoking table rights would not take
    away: the application's own role (read-only, it would stop the site), a superuser or other
    administrator, a role that owns objects here or inherits another's rights. '' if nothing."""
    row = conn.execute(text(
        "SELECT r.rolname = current_user, r.rolsuper OR r.rolcreaterole OR r.rolcreatedb "
        "OR r.rolreplication OR r.rolbypassrls, "
        "EXISTS (SELECT 1 FROM pg_class c WHERE c.relowner = r.oid) "
        "OR EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspowner = r.oid) "
        "OR EXISTS (SELECT 1 FROM pg_database d WHERE d.datdba = r.oid), "
        "EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid) "
        "FROM pg_roles r WHERE r.rolname = :n"
    ), {"n": name}).one()  # fmt: skip
    reasons = ["the application's own role", "an administrator", "owns objects",
               "a member of other roles"]  # fmt: skip
    return ", ".join(reason for reason, found in zip(reasons, row, strict=True) if found)
