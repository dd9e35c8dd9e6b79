"""The PostgreSQL index: the only package that talks to the database."""
