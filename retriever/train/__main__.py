"""`python -m retriever.train`."""

from retriever.train import main

if __name__ == "__main__":
    raise SystemExit(main())
