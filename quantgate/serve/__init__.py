"""Serving: the manifest (promote/rollback) and the budgeted gateway."""
