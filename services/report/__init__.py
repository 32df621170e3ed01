"""Report impressions: the IU chest X-ray reports, their fixed split, request limits and scoring (no gRPC here)."""
