"""Task classes (``infer``, ``train``; need ``monailabel``) and their plain logic (``grading``; does not)."""
