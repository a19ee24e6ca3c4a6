# Ships the YAML recipes in the wheel as cast_lightning.configs, so `cast demo` and `cast report` find
# configs/world/*.yaml from a non-editable install too.
