"""DICOM on the way out (and, beside it, the DICOM node): result objects are built in :mod:`.results`."""
