"""Thin task entry points: parse the body, apply one domain operation in a unit of work, return."""
