"""The host and the task prompts a HiDe/NoRGa method would own, called the way the method calls them."""

from norga.nn.task_prompts import TaskPromptedViT as Prompted  # noqa: F401 - the tests' name for it
