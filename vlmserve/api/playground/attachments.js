// Images waiting to be sent with the next message: files from the picker, drops and pastes become data: URIs.
// File names are shown with textContent and set as attribute values only, never parsed as HTML.

const MAX_IMAGE_BYTES = 20 * 1024 * 1024; // the server's default --max-image-bytes

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error || new Error("could not read the file"));
    reader.readAsDataURL(file);
  });
}

/** A thumbnail <figure> of one image, with its name as caption. */
export function thumbnail(image) {
  const figure = document.createElement("figure");
  figure.className = "thumb";
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = image.name;
  img.title = image.name;
  const caption = document.createElement("figcaption");
  caption.textContent = image.name;
  figure.append(img, caption);
  return figure;
}

export class Attachments {
  /** `container` shows the pending images; `onError(message)` reports files that are not images. */
  constructor(container, onError) {
    this.container = container;
    this.onError = onError;
    this.images = [];
  }

  async addFiles(files) {
    for (const file of files) {
      if (!file.type.startsWith("image/")) {
        this.onError(`${file.name || "that file"} is not an image (type ${file.type || "unknown"})`);
        continue;
      }
      if (file.size > MAX_IMAGE_BYTES) {
        this.onError(`${file.name} is larger than ${MAX_IMAGE_BYTES} bytes`);
        continue;
      }
      this.add({ name: file.name || "pasted image", url: await readAsDataUrl(file) });
    }
  }

  add(image) {
    this.images.push(image);
    this.render();
  }

  /** The pending images, which are then no longer pending. */
  take() {
    const taken = this.images;
    this.images = [];
    this.render();
    return taken;
  }

  render() {
    this.container.replaceChildren();
    this.images.forEach((image, index) => {
      const figure = thumbnail(image);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "\u00d7";
      remove.title = "remove this image";
      remove.addEventListener("click", () => {
        this.images.splice(index, 1);
        this.render();
      });
      figure.append(remove);
      this.container.append(figure);
    });
  }
}
