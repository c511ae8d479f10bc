"""The routes optimize() chooses among (see ROUTES in wavefront/routes/registry.py)."""
