"""Multi-step changes that span the catalog and a provider, each one crash-safe.

Every operation follows one pattern: validate; write the intent (an ``operations`` row plus the records in
state ``provisioning``/``deleting``) in one catalog transaction; do idempotent provider steps; commit the
outcome. While it runs, the operation holds a Postgres advisory lock keyed by its id, so ``reconcile`` can
tell an operation in flight (lock held) from one whose process died (lock free) and finish or undo it.
"""
