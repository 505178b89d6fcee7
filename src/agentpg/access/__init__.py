"""Access control: statement pre-checks and role/grant helpers."""
