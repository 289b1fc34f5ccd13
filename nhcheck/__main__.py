"""Allow ``python -m nhcheck``."""

from nhcheck.cli import main

if __name__ == "__main__":
    main()
