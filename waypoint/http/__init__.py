"""HTTP codecs of the waypoint, behind one vocabulary the router speaks.

``messages`` holds the request and response heads and Envoy's header rules
(hop-by-hop headers, local replies); ``h1server`` and ``h1client`` are the
HTTP/1.1 ends over ``httptools`` (llhttp), as asyncio protocols that sit on a
TCP socket or on an HBONE stream alike (:class:`mesh.hbone.LocalSocket`);
``h2server`` and ``h2client`` the HTTP/2 cleartext ends over ``h2``.
The router never knows which codec serves it.

May import: ``httptools``, ``h2`` and the standard library.
"""
