"""`python -m retriever.index`."""

from retriever.index import main

if __name__ == "__main__":
    raise SystemExit(main())
