"""Helpers shared by the test packages (real clients, no mocks of the engine)."""
