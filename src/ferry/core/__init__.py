"""The core: the deploy transaction and everything it reads and writes.

It imports no adapter, no observability, no launcher and no framework: an import contract in
pyproject.toml says so, and `make test` checks it.
"""
