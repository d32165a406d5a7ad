from tests.chaos.mounts import lostfs  # noqa: F401  (the fixture)
