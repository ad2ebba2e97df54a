"""The ops console and its JSON API (``creditnotes console``; docs/console.md, docs/api.md)."""
