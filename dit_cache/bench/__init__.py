"""Measuring caches: block-level speed (:mod:`.speed`) and the peer benchmark ``dit-cache bench``
(:mod:`.peer_bench`, its candidates in :mod:`.peers`, its timed rounds in :mod:`.rounds`)."""
