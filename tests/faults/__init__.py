"""Fault injection on real service processes, with their own PostgreSQL and broker."""
