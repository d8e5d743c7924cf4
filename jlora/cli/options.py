"""Options shared by the CLI's tasks."""

#: data options (CLI flags) and their defaults; None columns are detected from the file
DATA_OPTIONS = dict(text_column=None, label_column="label", prompt_column=None, response_column=None,
                    messages_column=None, validation_file=None, test_file=None, packing=False, image_column=None)
