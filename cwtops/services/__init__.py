"""Process supervision and the Debian packages the tests need."""
