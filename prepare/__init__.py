"""
The prepare scripts: one per kind of source, each writing data/<name>/ (see the README). They
share data.py's readers of users' files; runtime code never imports this package.
"""
