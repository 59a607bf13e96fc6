"""The adapter registry: immutable adapter versions (content-addressed) and movable aliases."""
