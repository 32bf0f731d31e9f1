"""``PeftModel.push_to_hub``: upload the adapter files, never the base model.

Without this method, attribute lookup on a PeftModel falls through to the wrapped transformers
model, whose push_to_hub would upload every base weight.
"""
from __future__ import annotations

import tempfile
from typing import Optional


class PushToHubMixin:
    def push_to_hub(self, repo_id: str, commit_message: str = "Upload adapter with fastpeft",
                    private: Optional[bool] = None, token: Optional[str] = None, revision: Optional[str] = None,
                    create_pr: bool = False, selected_adapters: Optional[list] = None, **save_kwargs):
        """Save the adapter(s) as ``save_pretrained`` does and upload that folder to ``repo_id``.

        Returns huggingface_hub's commit info.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fastpeft-push-") as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)
