"""The benchmark harness of the POST platform: `python -m bench`, see README.md."""
