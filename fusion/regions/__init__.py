"""Regional sampling maths: masks and their per-layer sizes (``masks``), the blend of the regions' attention
outputs (``blend``), the regional attention's context layout and k/v split (``attention``), a LoRA per region
(``lowrank``), boxes from files and pose images (``pose``), the Regions Editor's boxes (``editor_boxes``) and
the region preview picture (``preview``)."""
