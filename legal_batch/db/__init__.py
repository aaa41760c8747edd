"""Database access: where the database is, connections, migrations."""

from legal_batch.db.connection import DatabaseError, connect, database_url
from legal_batch.db.migrate import upgrade

__all__ = ["DatabaseError", "connect", "database_url", "upgrade"]
