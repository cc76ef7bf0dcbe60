"""The unit tier (`make test-fast`): the core over in-process fakes."""
