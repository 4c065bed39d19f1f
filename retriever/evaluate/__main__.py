"""`python -m retriever.evaluate`."""

from retriever.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
