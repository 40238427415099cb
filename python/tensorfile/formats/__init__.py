"""Readers and writers for the file formats tensorfile understands."""
