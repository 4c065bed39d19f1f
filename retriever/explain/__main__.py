"""`python -m retriever.explain`."""

from retriever.explain import main

if __name__ == "__main__":
    raise SystemExit(main())
