"""Pipeline stages, one module each: pure functions over stage folders, wrapped by Prefect in flows/."""
