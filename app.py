"""Hugging Face Space entry point: `python app.py [--model M --index I ...]` (see `python app.py --help`)."""

from app import main

if __name__ == "__main__":
    main()
