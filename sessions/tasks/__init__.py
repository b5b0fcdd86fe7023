"""Multi-session tasks (each a generator of seeded episodes)."""
