"""Shared fixtures: each plugin module builds one real dependency once per session."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.postgres",
    "tests.fixtures.tls",
    "tests.fixtures.s3",
    "tests.fixtures.registry",
    "tests.fixtures.worker",
]
