"""MONAI Label app serving the SDL glioma bundle as a classification model (``monailabel start_server --app``)."""
