"""The Label Studio ML backend (Flask). Never imports torch."""
