"""vlmserve: serve any vision-language model behind the OpenAI API."""

__version__ = "0.1.0"
