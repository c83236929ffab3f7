"""knockd-rotator as a package: the core plans the doors, an engine enforces them
(docs/DESIGN.md, "Layout")."""
