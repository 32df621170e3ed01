"""The reviewer web page: an ASGI app (``app``) and its listener (``listener``), served by the review service itself."""
