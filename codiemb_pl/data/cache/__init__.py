"""The Arrow training-data cache: entries (build once, open everywhere), records, the JSON-lines column reader, token ids and the mapped dataset."""
