"""Migration: Smithers databases and portable NDJSON into and out of Fabrik (docs/migration.md)."""
