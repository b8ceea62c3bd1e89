"""`fabrik dashboard`: a live terminal dashboard of runs.

The logic lives in plain modules that need no terminal: `runs` (the run list and how live events
change it, the rows), `filtering` (the `/` filter), `access` (what the caller's roles allow),
`form` (the new-run form), `detail` (one run: header, events, log lines) and `live` (the live
stream with reconnects). `app` is the Textual application on top of them.
"""
