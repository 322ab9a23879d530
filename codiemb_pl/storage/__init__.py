"""Storage that survives kills and other writers: crash-safe files and folders, the run lock, output-folder checks and safe checkpoint reading. Plain Python and torch; no Lightning."""
